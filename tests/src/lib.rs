//! Fixtures for end-to-end tests: real `redis-server` processes and the real
//! `respire` binary, each on a free loopback port in its own temporary
//! directory, stopped when dropped. Nothing here mocks a backend.
//!
//! The binaries must be on the machine: the README's test command installs
//! `redis-server`/`redis-tools` and builds `respire` before running the tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A free TCP port on 127.0.0.1 for a server a test starts.
///
/// Taken below the kernel's ephemeral range, where the thousands of outgoing connections the
/// tests make get their local ports (a port the OS picked with bind(0) could be taken by one
/// of them before the server binds it), each port at most once per test process, and checked
/// free by binding it.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = 10_000u32;
    let span = ephemeral_low.saturating_sub(low).max(1000);
    // Test processes run one after another: start each in a different place.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn wait_for_ping(port: u16, timeout: Duration, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            if s.write_all(b"PING\r\n").is_ok() {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    let reply = &buf[..n];
                    // Any reply: PONG, NOAUTH, respire's own errors, or a plugin's answer.
                    if reply
                        .first()
                        .is_some_and(|b| matches!(b, b'+' | b'-' | b'$'))
                    {
                        return Ok(());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} on port {port} did not come up within {timeout:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` process.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server with no persistence.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (`["--requirepass", "x"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
        };
        s.spawn().expect("start redis-server");
        s
    }

    /// Starts an empty Redis Cluster node. Its bus port is chosen free too (the default,
    /// port + 10000, may be taken or beyond 65535).
    pub fn start_cluster_node() -> RedisServer {
        Self::start_cluster_node_with(&[])
    }

    /// Starts an empty Redis Cluster node with extra arguments.
    pub fn start_cluster_node_with(extra: &[&str]) -> RedisServer {
        let bus = free_port().to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--cluster-port",
            &bus,
            // Healthy shards keep serving while one has no master (so tests can tell respire's
            // blocking from Redis Cluster's own).
            "--cluster-require-full-coverage",
            "no",
        ];
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    /// Starts a server on a given port (for "the backend comes up later").
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port,
            extra: Vec::new(),
            dir,
            child: None,
        };
        s.spawn().expect("start redis-server");
        s
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "redis-server is not installed: run the README's test command, which installs it",
            )?;
        self.child = Some(child);
        wait_for_ping(self.port, Duration::from_secs(10), "redis-server", &log)
    }

    /// "127.0.0.1:port"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A `redis` client connected directly (not through respire).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).expect("client")
    }

    /// Its process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("restart redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of real `redis-server` processes, created with `redis-cli --cluster create`.
pub struct Cluster {
    /// Every node (masters first as created; roles may change later).
    pub nodes: Vec<RedisServer>,
    masters: usize,
    tls_ports: Vec<u16>,
}

impl Cluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until the cluster is healthy.
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        let total = masters * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| RedisServer::start_cluster_node())
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(n.addr());
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = cmd.output().expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Cluster {
            nodes,
            masters,
            tls_ports: Vec::new(),
        };
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    /// Like [`start`](Self::start), every node also serving TLS (and speaking TLS on the
    /// cluster bus and for replication, `tls-cluster yes`), created over TLS: the nodes then
    /// announce their TLS ports to TLS clients. Plain ports stay open for the tests' checks.
    pub fn start_tls(masters: usize, replicas: usize, files: &TlsFiles) -> Cluster {
        let total = masters * (1 + replicas);
        let tls_ports: Vec<u16> = (0..total).map(|_| free_port()).collect();
        let nodes: Vec<RedisServer> = tls_ports
            .iter()
            .map(|&p| {
                let mut args = files.redis_args(p);
                args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
                RedisServer::start_cluster_node_with(
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            })
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.args(files.cli_args(true))
            .arg("--cluster")
            .arg("create");
        for p in &tls_ports {
            cmd.arg(format!("127.0.0.1:{p}"));
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = cmd.output().expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster {
            nodes,
            masters,
            tls_ports,
        };
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    /// The nodes' TLS ports (for a cluster from [`start_tls`](Self::start_tls)), in node order.
    pub fn tls_ports(&self) -> &[u16] {
        &self.tls_ports
    }

    /// Comma-separated seed addresses (the first two nodes).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(2)
            .map(|n| n.addr())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        self.cli(i, &["CLUSTER", "MYID"]).trim().to_string()
    }

    /// Index of the node with this port.
    pub fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// One key per master (`prefix` and a number), in the order found.
    pub fn key_per_master(&self, prefix: &str) -> Vec<String> {
        let masters = self.master_ports().len();
        let mut keys = Vec::new();
        let mut owners = std::collections::HashSet::new();
        for i in 0..100_000 {
            let key = format!("{prefix}{i}");
            if owners.insert(self.owner_port(&key)) {
                keys.push(key);
            }
            if owners.len() == masters {
                return keys;
            }
        }
        panic!("no key of {prefix}N on every master");
    }

    /// The port of the master that owns `key`'s slot (per node 0's view).
    pub fn owner_port(&self, key: &str) -> u16 {
        let slot: i64 = self
            .cli(0, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("slot");
        for line in self.cli(0, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            for r in &f[8..] {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>())
                    && (a..=b).contains(&slot)
                {
                    return f[1]
                        .split('@')
                        .next()
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                        .expect("port");
                }
            }
        }
        panic!("no master owns slot {slot}");
    }

    /// A replica and its master's index.
    pub fn a_replica(&self) -> (usize, usize) {
        for i in 0..self.nodes.len() {
            let info = self.cli(i, &["INFO", "replication"]);
            if info.contains("role:slave") {
                let port: u16 = info
                    .lines()
                    .find_map(|l| l.strip_prefix("master_port:"))
                    .expect("master_port")
                    .trim()
                    .parse()
                    .expect("a port");
                return (i, self.index_of(port));
            }
        }
        panic!("no replica");
    }

    /// Whether node `i` is currently a master.
    pub fn is_master(&self, i: usize) -> bool {
        self.cli(i, &["INFO", "replication"])
            .contains("role:master")
    }

    /// Adds an empty master (a new redis-server joined with `redis-cli --cluster add-node`).
    pub fn add_master(&mut self) -> usize {
        let node = RedisServer::start_cluster_node();
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node", &node.addr(), &self.nodes[0].addr()])
            .output()
            .expect("redis-cli --cluster add-node");
        assert!(
            out.status.success(),
            "add-node failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        self.nodes.push(node);
        self.masters += 1;
        self.nodes.len() - 1
    }

    /// Runs a command on node `i` with redis-cli and returns its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[i].port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ports of the current masters that own slots.
    pub fn master_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for line in self.cli(0, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() >= 9
                && f[2].contains("master")
                && !f[2].contains("fail")
                && let Some(p) = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
            {
                ports.push(p);
            }
        }
        ports.sort();
        ports
    }

    /// Waits until every node reports `cluster_state:ok`, agrees on the slot owners, and replicas are in sync.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = (0..self.nodes.len()).all(|i| {
                self.cli(i, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            });
            let slots: Vec<String> = (0..self.nodes.len())
                .map(|i| normalize_slots(&self.cli(i, &["CLUSTER", "SLOTS"])))
                .collect();
            let agree = slots.windows(2).all(|w| w[0] == w[1]);
            let synced = (0..self.nodes.len()).all(|i| {
                let info = self.cli(i, &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
            // Every node's CLUSTER SHARDS lists every node as online (Redis 7.0 takes a moment to
            // show fresh replicas in their master's shard).
            let shards_ok = (0..self.nodes.len()).all(|i| {
                let text = self.cli(i, &["CLUSTER", "SHARDS"]);
                let count = |w: &str| text.lines().filter(|l| l.trim() == w).count();
                count("online") == self.nodes.len()
                    && count("replica") == self.nodes.len() - self.masters
            });
            if ok && agree && synced && shards_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn normalize_slots(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    lines.join("\n")
}

/// A Redis Sentinel setup: a master with replicas, watched by sentinels.
pub struct SentinelSetup {
    /// The master, then the replicas (roles change on failover).
    pub servers: Vec<RedisServer>,
    /// The sentinel processes.
    pub sentinels: Vec<SentinelProc>,
    /// The master name the sentinels use.
    pub name: String,
}

/// One `redis-server --sentinel` process.
pub struct SentinelProc {
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SentinelSetup {
    /// Starts a master named `name` with `replicas` replicas and three sentinels (quorum 2,
    /// down after 1 s), and waits until the sentinels know every replica and each other.
    pub fn start(name: &str, replicas: usize) -> SentinelSetup {
        let master = RedisServer::start();
        let mut servers = vec![master];
        for _ in 0..replicas {
            let mport = servers[0].port.to_string();
            servers.push(RedisServer::start_with(&[
                "--replicaof",
                "127.0.0.1",
                &mport,
            ]));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &servers[1..] {
            while !cli(s.port, &["INFO", "replication"]).contains("master_link_status:up") {
                assert!(Instant::now() < deadline, "replica did not sync");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let sentinels: Vec<SentinelProc> = (0..3)
            .map(|_| {
                let dir = tempfile::tempdir().expect("tempdir");
                let port = free_port();
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {} 2\nsentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\nsentinel parallel-syncs {name} 1\n",
                        dir.path().display(),
                        servers[0].port
                    ),
                )
                .expect("sentinel.conf");
                let child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start sentinel");
                SentinelProc { port, _dir: dir, child }
            })
            .collect();
        let setup = SentinelSetup {
            servers,
            sentinels,
            name: name.to_string(),
        };
        for s in &setup.sentinels {
            loop {
                let reps = cli(s.port, &["SENTINEL", "REPLICAS", name])
                    .matches("master-link-status")
                    .count();
                let others = cli(s.port, &["SENTINEL", "SENTINELS", name])
                    .matches("runid")
                    .count();
                if reps == replicas && others == 2 {
                    break;
                }
                assert!(Instant::now() < deadline, "sentinels did not settle");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        setup
    }

    /// "host:port,…" of the sentinels.
    pub fn addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the master according to the first sentinel.
    pub fn master_port(&self) -> u16 {
        let out = cli(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name],
        );
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Runs redis-cli against a port and returns its output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the test plugins for `wasm32-wasip2` (once per test process).
fn build_plugins() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "-p", "hello-plugin", "-p", "misbehave-plugin", "-p", "probe-plugin", "-p", "respire-plugin-acl", "-p", "respire-plugin-rate-limit", "-p", "respire-plugin-metrics", "-p", "respire-plugin-cache-policy"])
            .arg("--manifest-path")
            .arg(&manifest)
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "building the test plugins for wasm32-wasip2 failed (is the target installed? the README's test command adds it)"
        );
    });
}

fn wasm_artifact(name: &str) -> PathBuf {
    build_plugins();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/wasm32-wasip2/release/<name>.wasm
    let target = exe
        .parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.parent())
        .expect("target dir");
    target.join(format!("wasm32-wasip2/release/{name}.wasm"))
}

/// The example hello-world plugin, built for `wasm32-wasip2`.
pub fn hello_plugin() -> PathBuf {
    wasm_artifact("hello_plugin")
}

/// A plugin that loops forever, allocates too much or panics on request (see tests/plugins/misbehave).
pub fn misbehave_plugin() -> PathBuf {
    wasm_artifact("misbehave_plugin")
}

/// A configurable plugin that counts, rewrites, takes tokens and tags replies (see tests/plugins/probe).
pub fn probe_plugin() -> PathBuf {
    wasm_artifact("probe_plugin")
}

/// A plugin shipped in `plugins/` (`acl`, …), built for `wasm32-wasip2`.
pub fn shipped_plugin(name: &str) -> PathBuf {
    wasm_artifact(name)
}

/// `GET path` over HTTP/1.1 on loopback: the status code and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one series in a Prometheus text exposition (`name{labels}` exactly as printed).
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Path of the `respire` binary built next to the running test executable.
pub fn respire_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RESPIRE_BIN") {
        return PathBuf::from(p);
    }
    // `cargo test -p respire-tests` builds the library but not the binary: build it (a no-op when fresh).
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        if let Ok(cargo) = std::env::var("CARGO") {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let status = Command::new(cargo)
                // The same selection as the test command's build, so features unify the same
                // way and this is a no-op after it.
                .args([
                    "build",
                    "--quiet",
                    "--workspace",
                    "--all-targets",
                    "--manifest-path",
                ])
                .arg(manifest)
                .status();
            assert!(status.is_ok_and(|s| s.success()), "building respire failed");
        }
    });
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/respire
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("respire");
    assert!(
        bin.exists(),
        "{} is missing: run the README's test command (it builds respire before testing)",
        bin.display()
    );
    bin
}

/// A `respire` process.
pub struct Respire {
    /// Its client port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Respire {
    /// Starts respire in front of `backend` ("host:port") with extra flags.
    pub fn start(backend: &str, extra: &[&str]) -> Respire {
        let mut args = vec!["--backend", backend];
        args.extend_from_slice(extra);
        Self::start_args(&args)
    }

    /// Starts respire in front of `backend` with the plugins in `plugins`, a metrics endpoint
    /// and extra flags; returns it with the metrics endpoint's port.
    pub fn with_plugins(backend: &str, plugins: &Path, extra: &[&str]) -> (Respire, u16) {
        let metrics_port = free_port();
        let metrics = format!("127.0.0.1:{metrics_port}");
        let mut args = vec![
            "--plugins",
            plugins.to_str().expect("utf-8 path"),
            "--metrics",
            &metrics,
        ];
        args.extend_from_slice(extra);
        (Self::start(backend, &args), metrics_port)
    }

    /// Starts respire in front of `backend` with the plugins in `plugins` and two workers
    /// that connections are dealt to in turn (`--worker-affinity 0`), so that a test's few
    /// connections from one address are served by both threads.
    pub fn with_plugins_over_two_workers(backend: &str, plugins: &Path) -> Respire {
        let plugins = plugins.to_str().expect("utf-8 path");
        Self::start(
            backend,
            &[
                "--plugins",
                plugins,
                "--workers",
                "2",
                "--worker-affinity",
                "0",
            ],
        )
    }

    /// Starts respire with a configuration file of this text (plus `--listen`).
    pub fn with_config(toml: &str) -> Respire {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("respire.toml");
        std::fs::write(&cfg, toml).expect("write config");
        let cfg = cfg.to_str().expect("utf-8 path").to_string();
        Self::spawn(dir, &["--config", &cfg])
    }

    /// Starts respire with exactly these flags plus `--listen`.
    pub fn start_args(args: &[&str]) -> Respire {
        Self::spawn(tempfile::tempdir().expect("tempdir"), args)
    }

    fn spawn(dir: tempfile::TempDir, args: &[&str]) -> Respire {
        let port = free_port();
        let log = dir.path().join("respire.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(respire_bin())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Compiled plugins go to this instance's own folder unless a test says otherwise.
            .env("XDG_CACHE_HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn respire");
        let r = Respire {
            port,
            dir,
            child: Some(child),
        };
        wait_for_ping(port, Duration::from_secs(10), "respire", &log).expect("respire starts");
        r
    }

    /// Its resident memory now, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// A memory figure of `/proc/PID/status` (`VmRSS`, `VmSize`, `VmHWM` …), in KiB.
    pub fn status_kib(&self, field: &str) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let prefix = format!("{field}:");
        status
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    }

    /// Its open file descriptors now.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .expect("proc fd")
    }

    /// Its process id; panics when it has exited.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// "127.0.0.1:port"
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A `redis` client pointed at respire.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).expect("client")
    }

    /// A synchronous connection through respire.
    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("connect to respire")
    }

    /// respire's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("respire.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to `timeout`) for a clean exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Respire {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw TCP connection for byte-exact checks.
pub struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects to a port on 127.0.0.1.
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Raw { s }
    }

    /// Caps the socket's receive buffer (and turns the kernel's autotuning of it off): a
    /// client that never reads then holds a known amount in the kernel whatever the machine's
    /// `tcp_rmem` (up to 32 MiB on some).
    pub fn limit_receive_buffer(&self, bytes: usize) {
        socket2::SockRef::from(&self.s)
            .set_recv_buffer_size(bytes)
            .expect("SO_RCVBUF");
    }

    /// The connection's `CLIENT ID`, as text.
    pub fn client_id(&mut self) -> String {
        let reply = self.roundtrip(&resp(&[b"CLIENT", b"ID"]), 1);
        String::from_utf8_lossy(&reply)
            .trim_start_matches(':')
            .trim()
            .to_string()
    }

    /// Connects as a RESP3 client with `CLIENT TRACKING on` (default mode).
    pub fn tracking(port: u16) -> Raw {
        let mut t = Raw::connect(port);
        t.roundtrip(&resp(&[b"HELLO", b"3"]), 1);
        assert_eq!(
            t.roundtrip(&resp(&[b"CLIENT", b"TRACKING", b"on"]), 1),
            b"+OK\r\n"
        );
        t
    }

    /// Sends bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Reads until `n` complete RESP replies have arrived (or the peer closes); returns the raw bytes.
    pub fn read_replies(&mut self, n: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 65536];
        loop {
            if count_replies(&buf) >= n {
                return buf;
            }
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return buf,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        }
    }

    /// Reads `n` complete frames (replies or pushes), each on its own (fewer if the peer
    /// closes or the read times out).
    pub fn read_frames(&mut self, n: usize) -> Vec<Vec<u8>> {
        let buf = self.read_replies(n);
        let mut frames = Vec::new();
        let mut rest = &buf[..];
        while let Ok(Some(len)) = respire::protocol::reply_len(rest) {
            frames.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
        frames
    }

    /// Sends `req`, reads `n` replies.
    pub fn roundtrip(&mut self, req: &[u8], n: usize) -> Vec<u8> {
        self.send(req);
        self.read_replies(n)
    }

    /// One read of whatever has arrived (`Ok(0)`: the peer closed).
    pub fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.read(buf)
    }

    /// What arrives within `t`, if anything (the peer closing counts): for "nothing more
    /// than expected".
    pub fn more_within(&mut self, t: Duration) -> Option<String> {
        self.set_timeout(t);
        let mut tmp = [0u8; 4096];
        self.s
            .read(&mut tmp)
            .ok()
            .map(|n| String::from_utf8_lossy(&tmp[..n]).into_owned())
    }

    /// Sets how long reads wait.
    pub fn set_timeout(&mut self, t: Duration) {
        self.s.set_read_timeout(Some(t)).expect("timeout");
    }

    /// Whether the peer has closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        matches!(self.s.read(&mut tmp), Ok(0))
    }
}

fn count_replies(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let Ok(Some(len)) = respire::protocol::reply_len(buf) {
        n += 1;
        buf = &buf[len..];
    }
    n
}

/// Sends each command of `script` to both ports and asserts byte-identical replies
/// (`direct` is a plain Redis, `proxy` is respire).
pub fn assert_same_replies(direct: u16, proxy: u16, script: &[&[&str]]) {
    let mut d = Raw::connect(direct);
    let mut p = Raw::connect(proxy);
    for (i, cmd) in script.iter().enumerate() {
        let args: Vec<&[u8]> = cmd.iter().map(|s| s.as_bytes()).collect();
        let req = resp(&args);
        let want = d.roundtrip(&req, 1);
        let got = p.roundtrip(&req, 1);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "command #{i} {cmd:?}: respire (left) differs from direct Redis (right)"
        );
    }
}

/// The RESP3 push a tracking client gets when `key` changes.
pub fn invalidation(key: &str) -> String {
    format!(
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n${}\r\n{key}\r\n",
        key.len()
    )
}

/// The RESP3 push that tells a tracking client to drop everything (a flush, or changes that
/// may have gone unseen).
pub const INVALIDATE_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// Encodes a command as RESP.
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A script of commands over every data type, for comparing respire with direct Redis byte for byte.
pub const DATA_TYPES: &[&[&str]] = &[
    &["SET", "s", "hello"],
    &["APPEND", "s", " world"],
    &["GET", "s"],
    &["GETRANGE", "s", "0", "4"],
    &["INCRBY", "n", "41"],
    &["INCRBYFLOAT", "f", "1.5"],
    &["SET", "s2", "x", "NX", "PX", "100000"],
    &["SET", "s2", "y", "NX"],
    &["MSET", "a", "1", "b", "2"],
    &["MGET", "a", "b", "missing"],
    &["GETDEL", "a"],
    &["STRLEN", "s"],
    &["HSET", "h", "f1", "v1", "f2", "v2"],
    &["HGET", "h", "f1"],
    &["HGETALL", "h"],
    &["HINCRBY", "h", "c", "3"],
    &["HMGET", "h", "f1", "nope"],
    &["HKEYS", "h"],
    &["HDEL", "h", "f2"],
    &["LPUSH", "l", "a", "b", "c"],
    &["RPUSH", "l", "d"],
    &["LRANGE", "l", "0", "-1"],
    &["LPOP", "l", "2"],
    &["LINDEX", "l", "0"],
    &["LPOS", "l", "d"],
    &["SADD", "set", "1", "2", "3"],
    &["SISMEMBER", "set", "2"],
    &["SMEMBERS", "set"],
    &["SINTER", "set", "set"],
    &["SCARD", "set"],
    &["ZADD", "z", "1", "one", "2", "two", "3.5", "three"],
    &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    &["ZSCORE", "z", "three"],
    &["ZINCRBY", "z", "2", "one"],
    &["ZREVRANK", "z", "one"],
    &["ZRANGEBYSCORE", "z", "-inf", "+inf", "LIMIT", "0", "2"],
    &["ZPOPMIN", "z"],
    &["XADD", "st", "1-1", "k", "v1"],
    &["XADD", "st", "2-1", "k", "v2"],
    &["XLEN", "st"],
    &["XRANGE", "st", "-", "+"],
    &["XGROUP", "CREATE", "st", "g", "0"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "COUNT",
        "1",
        "STREAMS",
        "st",
        ">",
    ],
    &["XACK", "st", "g", "1-1"],
    &["XPENDING", "st", "g"],
    &["XREAD", "COUNT", "5", "STREAMS", "st", "0"],
    &["XINFO", "GROUPS", "st"],
    &["PFADD", "hll", "a", "b", "c", "a"],
    &["PFCOUNT", "hll"],
    &["SETBIT", "bits", "7", "1"],
    &["GETBIT", "bits", "7"],
    &["BITCOUNT", "bits"],
    &["BITPOS", "bits", "1"],
    &[
        "EVAL",
        "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}",
        "1",
        "counter",
        "arg",
    ],
    &["SCRIPT", "LOAD", "return 42"],
    &["EVALSHA", "1fa00e76656cc152ad327c13fe365858fd7be306", "0"],
    &["EVAL", "return redis.error_reply('boom')", "0"],
    &["TYPE", "z"],
    &["EXISTS", "s", "h", "nope"],
    &["EXPIRE", "s", "1000"],
    &["TTL", "s"],
    &["PERSIST", "s"],
    &["DEL", "s", "h"],
    &["DBSIZE"],
    &["ECHO", "echo me"],
    &["PING"],
    &["PING", "pong me"],
    &["NOSUCHCOMMAND", "x"],
    &["GET"],
    &["SELECT", "2"],
    &["SET", "in2", "v"],
    &["GET", "in2"],
    &["SELECT", "99"],
    &["SELECT", "x"],
    &["SELECT", "0"],
    &["GET", "in2"],
    &["HELLO", "4"],
    &["HELLO", "x"],
    &["UNSUBSCRIBE"],
    &["PUNSUBSCRIBE", "a", "b"],
    &["EXEC"],
    &["DISCARD"],
    &["CLIENT", "SETNAME", "bad name"],
    &["CLIENT", "SETNAME", "good"],
    &["CLIENT", "GETNAME"],
    &["CLIENT", "NOSUCH"],
    &["CLIENT", "GETNAME", "extra"],
    &["AUTH", "pass"],
];

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Commands answered successfully.
    pub ops: u64,
    /// Error replies and connection failures, with when they happened.
    pub errors: Vec<(Instant, String)>,
    /// Reads that returned something other than the value just written (misrouted or out of order).
    pub wrong_reads: u64,
    /// Reads (`GET`, `MGET`) answered with an error: respire sends a read again after a
    /// failover, so there should be none.
    pub read_errors: u64,
    /// The last acknowledged value of every key written.
    pub acked: std::collections::HashMap<String, i64>,
    /// Latencies of successful commands.
    pub latencies: Vec<Duration>,
}

impl LoadReport {
    /// The longest span between the first and last error of a burst (errors less than 1 s apart).
    pub fn longest_error_window(&self) -> Duration {
        let mut times: Vec<Instant> = self.errors.iter().map(|e| e.0).collect();
        times.sort();
        let mut longest = Duration::ZERO;
        let mut start = None::<Instant>;
        let mut prev = None::<Instant>;
        for t in times {
            match (start, prev) {
                (Some(s), Some(p)) if t.duration_since(p) < Duration::from_secs(1) => {
                    longest = longest.max(t.duration_since(s))
                }
                _ => start = Some(t),
            }
            prev = Some(t);
        }
        longest
    }

    /// A latency percentile (0–100).
    pub fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() - 1) as f64 * p / 100.0).round() as usize]
    }

    /// One line for the test output.
    pub fn summary(&self, event: &str) -> String {
        format!(
            "{event}: {} ops, {} errors ({} on reads), longest error window {:?}, {} wrong reads, p99 {:?}, first error: {:?}",
            self.ops,
            self.errors.len(),
            self.read_errors,
            self.longest_error_window(),
            self.wrong_reads,
            self.percentile(99.0),
            self.errors.first().map(|e| &e.1)
        )
    }
}

/// Concurrent clients writing unique values through a port and reading each back.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadReport>>,
}

/// A read of the load failed: counted, and the connection dropped if it broke.
fn read_failed(
    e: &redis::RedisError,
    con: &mut Option<redis::Connection>,
    report: &mut LoadReport,
) {
    if e.is_io_error() || e.is_connection_dropped() {
        *con = None;
    }
    report.errors.push((Instant::now(), e.to_string()));
    report.read_errors += 1;
}

impl Load {
    /// Starts `clients` threads, each with its own connection to `port`.
    pub fn start(port: u16, clients: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..clients)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let client =
                        redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
                    let mut report = LoadReport::default();
                    let mut con: Option<redis::Connection> = None;
                    let mut i: i64 = 0;
                    // Keys whose last write failed (it may have been applied or not).
                    let mut uncertain = std::collections::HashSet::new();
                    // Bounded: at most a million writes per client, and the stop flag.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 1_000_000 {
                        i += 1;
                        let c = match con.as_mut() {
                            Some(c) => c,
                            None => {
                                match client.get_connection_with_timeout(Duration::from_secs(5)) {
                                    Ok(c) => con.insert(c),
                                    Err(e) => {
                                        report.errors.push((Instant::now(), e.to_string()));
                                        std::thread::sleep(Duration::from_millis(10));
                                        continue;
                                    }
                                }
                            }
                        };
                        let key = format!("load:{t}:{}", i % 200);
                        let start = Instant::now();
                        let set: redis::RedisResult<()> =
                            redis::cmd("SET").arg(&key).arg(i).query(c);
                        match set {
                            Ok(()) => {
                                report.ops += 1;
                                report.latencies.push(start.elapsed());
                                report.acked.insert(key.clone(), i);
                            }
                            Err(e) => {
                                if e.is_io_error() || e.is_connection_dropped() {
                                    con = None;
                                }
                                report.errors.push((Instant::now(), e.to_string()));
                                // It may or may not have been applied.
                                uncertain.insert(key);
                                continue;
                            }
                        }
                        uncertain.remove(&key);
                        if i % 5 == 0 {
                            // A read of the last ten keys written, split over the shards: each
                            // must hold its last acknowledged value.
                            let keys: Vec<String> = ((i - 9).max(1)..=i)
                                .map(|j| format!("load:{t}:{}", j % 200))
                                .collect();
                            let start = Instant::now();
                            let got: redis::RedisResult<Vec<Option<i64>>> =
                                redis::cmd("MGET").arg(&keys).query(c);
                            match got {
                                Ok(vals) => {
                                    report.ops += 1;
                                    report.latencies.push(start.elapsed());
                                    let wrong = keys.iter().zip(&vals).any(|(k, v)| {
                                        !uncertain.contains(k)
                                            && report.acked.get(k).is_some_and(|a| *v != Some(*a))
                                    });
                                    if wrong || vals.len() != keys.len() {
                                        report.wrong_reads += 1;
                                    }
                                }
                                Err(e) => {
                                    read_failed(&e, &mut con, &mut report);
                                    continue;
                                }
                            }
                        }
                        let Some(c) = con.as_mut() else { continue };
                        let start = Instant::now();
                        let got: redis::RedisResult<Option<i64>> =
                            redis::cmd("GET").arg(&key).query(c);
                        match got {
                            Ok(v) => {
                                report.ops += 1;
                                report.latencies.push(start.elapsed());
                                if v != Some(i) {
                                    report.wrong_reads += 1;
                                }
                            }
                            Err(e) => read_failed(&e, &mut con, &mut report),
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients and merges their reports.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads {
            let r = t.join().expect("load thread");
            all.ops += r.ops;
            all.errors.extend(r.errors);
            all.wrong_reads += r.wrong_reads;
            all.read_errors += r.read_errors;
            all.acked.extend(r.acked);
            all.latencies.extend(r.latencies);
        }
        all
    }
}

/// Acknowledged writes that no longer read back (through `port`), as (key, expected, found).
pub fn lost_writes(
    port: u16,
    acked: &std::collections::HashMap<String, i64>,
) -> Vec<(String, i64, Option<i64>)> {
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("client")
        .get_connection()
        .expect("connect");
    let mut lost = Vec::new();
    for (k, v) in acked {
        let got: Option<i64> = redis::cmd("GET").arg(k).query(&mut con).expect("GET");
        if got != Some(*v) {
            lost.push((k.clone(), *v, got));
        }
    }
    lost
}

/// Test certificates made with `openssl`, as Redis's own `utils/gen-test-certs.sh` makes
/// them: a CA, a certificate for 127.0.0.1 and localhost (for servers, and as Redis uses its
/// certificate both ways, for clients too) and a client certificate.
pub struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    /// A new CA and certificates signed by it; `name` goes into the CA's common name.
    pub fn generate(name: &str) -> TlsFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(dir.path())
                .args(args)
                .output()
                .expect(
                    "openssl is not installed: run the README's test command, which installs it",
                );
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = |file: &str| {
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                file,
            ])
        };
        key("ca.key");
        let subject = format!("/O=respire test/CN=respire test CA {name}");
        openssl(
            &[
                "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "3650", "-subj",
                &subject,
            ]
            .into_iter()
            .chain([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "ca.crt",
            ])
            .collect::<Vec<_>>(),
        );
        for (who, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n",
            ),
            (
                "client",
                "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
            ),
        ] {
            std::fs::write(dir.path().join(format!("{who}.ext")), ext).expect("write ext");
            key(&format!("{who}.key"));
            openssl(&[
                "req",
                "-new",
                "-key",
                &format!("{who}.key"),
                "-subj",
                &format!("/O=respire test/CN={who}"),
                "-out",
                &format!("{who}.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "365",
                "-sha256",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.crt"),
            ]);
        }
        TlsFiles { dir }
    }

    /// The path of one of the files: `ca.crt`, `server.crt`, `server.key`, `client.crt`, `client.key`.
    pub fn path(&self, file: &str) -> String {
        self.dir
            .path()
            .join(file)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    /// `redis-server` arguments serving TLS on `tls_port` with these files (client
    /// certificates required, as Redis's default).
    pub fn redis_args(&self, tls_port: u16) -> Vec<String> {
        [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &self.path("server.crt"),
            "--tls-key-file",
            &self.path("server.key"),
        ]
        .into_iter()
        .chain(["--tls-ca-cert-file", &self.path("ca.crt")])
        .map(String::from)
        .collect()
    }

    /// `redis-cli` arguments for a TLS connection trusting this CA, with the client certificate when `cert`.
    pub fn cli_args(&self, cert: bool) -> Vec<String> {
        let mut a = vec!["--tls".to_string(), "--cacert".into(), self.path("ca.crt")];
        if cert {
            a.extend([
                "--cert".into(),
                self.path("client.crt"),
                "--key".into(),
                self.path("client.key"),
            ]);
        }
        a
    }
}

/// Runs redis-cli with these arguments against a port; its standard output and error together.
pub fn cli_with(port: u16, pre: &[String], args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(pre)
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TLS connection (rustls) for byte-exact checks.
pub struct TlsConn {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsConn {
    /// Connects to 127.0.0.1:`port`, trusting the CA in `ca`, presenting `cert` (certificate,
    /// key files) when given, and completes the handshake. A server that refuses the client's
    /// certificate may only say so at the first read (TLS 1.3).
    pub fn connect(port: u16, ca: &str, cert: Option<(&str, &str)>) -> std::io::Result<TlsConn> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
            roots
                .add(c.map_err(std::io::Error::other)?)
                .map_err(std::io::Error::other)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots);
        let config = match cert {
            Some((c, k)) => {
                let chain = CertificateDer::pem_file_iter(c)
                    .map_err(std::io::Error::other)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(std::io::Error::other)?;
                let key = PrivateKeyDer::from_pem_file(k).map_err(std::io::Error::other)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(std::io::Error::other)?
            }
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .map_err(std::io::Error::other)?;
        let mut sock = TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(TlsConn {
            s: rustls::StreamOwned::new(conn, sock),
        })
    }

    /// The subject common name's bytes are somewhere in the server's certificate: whether `cn` appears in it.
    pub fn server_cert_mentions(&self, cn: &str) -> bool {
        self.s
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .is_some_and(|c| c.windows(cn.len()).any(|w| w == cn.as_bytes()))
    }

    /// Sends `req`, reads until `n` complete replies arrived (or the connection ended); the raw bytes.
    pub fn roundtrip(&mut self, req: &[u8], n: usize) -> Vec<u8> {
        if self.s.write_all(req).and_then(|_| self.s.flush()).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let mut tmp = [0u8; 65536];
        while count_replies(&buf) < n {
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        }
        buf
    }
}
